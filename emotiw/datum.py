"""Caffe's `Datum` message without pycaffe or generated code, for reading LevelDB/LMDB features.

The message class is built at run time from a descriptor with caffe.proto's field numbers, so it
works with any current protobuf runtime and needs neither protoc nor a Caffe build.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_FIELD = descriptor_pb2.FieldDescriptorProto


def _datum_class():
    file_proto = descriptor_pb2.FileDescriptorProto(name="emotiw_caffe_datum.proto", package="emotiw_caffe",
                                                    syntax="proto2")
    message = file_proto.message_type.add(name="Datum")
    for name, number, kind, label in (
            ("channels", 1, _FIELD.TYPE_INT32, _FIELD.LABEL_OPTIONAL),
            ("height", 2, _FIELD.TYPE_INT32, _FIELD.LABEL_OPTIONAL),
            ("width", 3, _FIELD.TYPE_INT32, _FIELD.LABEL_OPTIONAL),
            ("data", 4, _FIELD.TYPE_BYTES, _FIELD.LABEL_OPTIONAL),
            ("label", 5, _FIELD.TYPE_INT32, _FIELD.LABEL_OPTIONAL),
            ("float_data", 6, _FIELD.TYPE_FLOAT, _FIELD.LABEL_REPEATED),
            ("encoded", 7, _FIELD.TYPE_BOOL, _FIELD.LABEL_OPTIONAL)):
        message.field.add(name=name, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("emotiw_caffe.Datum"))


Datum = _datum_class()
