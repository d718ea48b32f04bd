"""Caffe's databases: LevelDB/LMDB stores of `Datum` messages (features, images) and building LMDBs.

`Datum` is built at run time from a descriptor with caffe.proto's field numbers, so reading a store
works with any current protobuf runtime and needs neither protoc nor a Caffe build.

A features store is what extract_features writes: keys are running image indices, every value a
Datum with DIM float values.
"""

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from emotiw.caffe.tools import run_tool
from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, replace_dir

LMDB_SHUFFLE_SEED = 0

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


def read_store(path, use_lmdb=False):
    """All (key, value) pairs of a LevelDB (or LMDB) folder, in key order."""
    path = Path(path)
    kind = "LMDB" if use_lmdb else "LevelDB"
    if not path.is_dir():
        raise UserError(f"{path}: no such {kind} folder")
    if use_lmdb:
        import lmdb

        try:
            env = lmdb.open(str(path), readonly=True, lock=False)
        except lmdb.Error as error:
            raise UserError(f"{path} is not an LMDB ({error}); drop --lmdb for a LevelDB") from None
        with env, env.begin() as txn:
            return list(txn.cursor())
    import plyvel

    # LevelDB writes LOCK and LOG into the folder before it finds out there is no database, so a
    # folder without LevelDB's CURRENT file is refused unopened
    if not (path / "CURRENT").is_file():
        hint = "; it holds data.mdb: pass --lmdb" if (path / "data.mdb").is_file() else ""
        raise UserError(f"{path} is not a LevelDB (no CURRENT file){hint}")
    try:
        db = plyvel.DB(str(path), create_if_missing=False)
    except plyvel.IOError as error:
        if "IO error: lock " in str(error):  # LevelDB's words for a LOCK file another process holds
            raise UserError(f"{path} is locked by another process (is extract_features still writing it?); "
                            "wait for it to finish or stop it, then run again") from None
        raise UserError(f"{path}: cannot read the LevelDB ({error})") from None
    except plyvel.Error as error:
        raise UserError(f"{path} is not a readable LevelDB ({error})") from None
    try:
        return list(db.iterator())
    finally:
        db.close()


def decode_features(pairs, dim, where):
    """{image index: float32 values} of extract_features' (key, Datum) pairs; dim None = the first's."""
    from google.protobuf.message import DecodeError

    rows, keys = {}, {}
    for key, value in pairs:
        shown = key.decode("ascii", "replace")
        if not key.isdigit():
            raise UserError(f"{where}: key {shown!r} is not an image index; extract_features writes "
                            "decimal image indices as keys. Is this a features store?")
        datum = Datum()
        try:
            datum.ParseFromString(value)
        except DecodeError:
            raise UserError(f"{where}: key {shown}: the value is not a Caffe Datum") from None
        values = np.array(datum.float_data, dtype=np.float32)
        dim = len(values) if dim is None else dim
        if len(values) != dim:
            raise UserError(f"{where}: key {shown} holds {len(values)} feature values, not DIM={dim}: the store "
                            f"was extracted from a blob of another size; pass DIM={len(values)} "
                            "or extract the blob you want")
        index = int(key)
        if index in rows:
            raise UserError(f"{where}: keys {keys[index]} and {shown} are both image {index}")
        rows[index], keys[index] = values, shown
    return rows, keys


def feature_matrix(rows, keys, count, where):
    """The (count, dim) float64 matrix of rows 0..count-1; refuses gaps and a wrong image count."""
    if not rows:
        raise UserError(f"{where}: the store is empty")
    for position, index in enumerate(sorted(rows)):
        if index != position:
            raise UserError(f"{where}: keys are not contiguous: image {position} is missing "
                            f"(key {keys[index]} comes after image {position - 1})")
    if len(rows) != count:
        raise UserError(f"{where} holds {len(rows)} images (keys 0..{len(rows) - 1}), but BATCH_NUM x "
                        f"BATCH_SIZE = {count}; give the numbers extract_features ran with")
    return np.stack([rows[index] for index in range(count)]).astype(np.float64)


def read_store_features(path, batch_num, batch_size, dim, use_lmdb=False, num_images=None):
    """`feats` of a store: one row per image in key order, wrap-around rows past num_images dropped."""
    where = str(path)
    rows, keys = decode_features(read_store(path, use_lmdb), dim, where)
    feats = feature_matrix(rows, keys, batch_num * batch_size, where)
    if num_images is not None:
        if not 0 < num_images <= len(feats):
            raise UserError(f"--num-images {num_images} must be between 1 and the {len(feats)} images in {where}")
        feats = feats[:num_images]
    return feats


def lmdb_labels(path):
    """The labels of an image LMDB's Datums, in key order."""
    import lmdb

    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        labels = [Datum.FromString(value).label for _, value in txn.cursor()]
    if not labels:
        raise UserError(f"LMDB {path} is empty")
    return labels


def lmdb_order(lines, split):
    """Training LMDBs are read in order by Caffe's Data layer, which never shuffles: shuffle
    training lists with a fixed seed (convert_imageset's own --shuffle is seeded from the clock).
    Other splits keep the list order, so results map back to frames."""
    if not split.startswith("train"):
        return list(lines)
    order = np.random.default_rng(LMDB_SHUFFLE_SEED).permutation(len(lines))
    return [lines[i] for i in order]


def build_lmdb(list_path, out_dir, split, gray=False):
    """`lmdb/<split>_lmdb` with Caffe's convert_imageset and `lmdb/<split>_mean.binaryproto` with
    compute_image_mean. Both are rebuilt only when the list (or --gray) changed."""
    lmdb_dir = Path(out_dir) / "lmdb"
    lmdb_dir.mkdir(parents=True, exist_ok=True)
    target = lmdb_dir / f"{split}_lmdb"
    mean = lmdb_dir / f"{split}_mean.binaryproto"
    lines = lmdb_order(Path(list_path).read_text().splitlines(keepends=True), split)
    stamp = hashlib.sha256(f"gray={gray}\n{''.join(lines)}".encode()).hexdigest()
    stamp_path = lmdb_dir / f".{split}_lmdb.sha256"
    if target.is_dir() and mean.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return target, mean
    with tempfile.TemporaryDirectory(prefix=f".{split}_lmdb.", dir=lmdb_dir) as work:
        work = Path(work)
        (work / "list.txt").write_text("".join(lines))
        db = work / "db"
        # The list holds absolute paths, so the root folder is empty.
        run_tool("convert_imageset", "--backend=lmdb", f"--gray={str(gray).lower()}", "", work / "list.txt", db)
        run_tool("compute_image_mean", "--backend=lmdb", db, work / "mean.binaryproto")
        os.replace(work / "mean.binaryproto", mean)
        replace_dir(db, target)
    with atomic_open(stamp_path) as handle:
        handle.write(stamp)
    return target, mean


@contextlib.contextmanager
def write_store(path, db):
    """A new LevelDB or LMDB at `path`; yields put(pairs), one write transaction per call."""
    if db == "lmdb":
        import lmdb

        env = lmdb.open(str(path))
        try:
            def put(pairs):
                while True:
                    try:
                        with env.begin(write=True) as txn:
                            for key, value in pairs:
                                txn.put(key, value)
                        return
                    except lmdb.MapFullError:  # the map grows as Caffe's does: doubled, then the batch again
                        env.set_mapsize(env.info()["map_size"] * 2)

            yield put
        finally:
            env.close()
        return
    import plyvel

    leveldb = plyvel.DB(str(path), create_if_missing=True, error_if_exists=True)
    try:
        def put(pairs):
            with leveldb.write_batch() as write:
                for key, value in pairs:
                    write.put(key, value)

        yield put
    finally:
        leveldb.close()
