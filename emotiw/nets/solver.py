"""Solver prototxts from a mapping of SolverParameter fields (the released values of each net).

The released solvers say `solver_mode: GPU`; ours say CPU, which `caffe train --gpu=N` overrides.
"""

from emotiw.caffe.env import import_caffe
from emotiw.errors import UserError


def make_solver(values, net_path, snapshot_prefix, overrides=None):
    """A SolverParameter with `values`, then `overrides` (e.g. {"max_iter": 2}); CPU mode."""
    pb2 = import_caffe().proto.caffe_pb2
    solver = pb2.SolverParameter(net=str(net_path), snapshot_prefix=str(snapshot_prefix),
                                 solver_mode=pb2.SolverParameter.CPU)
    set_fields(solver, values)
    set_fields(solver, overrides or {})
    return solver


def set_fields(solver, values):
    """Assigns SolverParameter fields by name; a list replaces a repeated field."""
    for name, value in values.items():
        if name not in solver.DESCRIPTOR.fields_by_name:
            raise UserError(f"'{name}' is not a Caffe solver field")
        try:
            if isinstance(value, (list, tuple)):
                del getattr(solver, name)[:]
                getattr(solver, name).extend(value)
            elif hasattr(getattr(solver, name), "extend"):  # a repeated field given one value
                del getattr(solver, name)[:]
                getattr(solver, name).append(value)
            else:
                setattr(solver, name, value)
        except (TypeError, ValueError) as error:
            raise UserError(f"solver field '{name}' cannot take {value!r}: {error}")
