"""Ray as the engine for more than one machine: a stage's tasks, one Ray task each.

`preprocess`, `test` and `extract` take `ray=None|True|ADDRESS` (`--ray [ADDRESS]`), which makes their
Executor run its tasks through `Cluster.run`: the same function calls as a local run (preprocess's
clips, test's forward passes of a clip, extract's pieces of mini-batches), whose results the stage
merges in task order, so the outputs equal a local run's byte for byte.

- Connecting: True is `ray.init()` (the cluster RAY_ADDRESS names, else a new one on this machine,
  private: on 127.0.0.1, its files under the emotiw cache); an ADDRESS is `ray.init(address=ADDRESS)`. A connection opened here is closed at the end, one the
  caller had is kept. An address that cannot be reached is one line (Ray itself keeps waiting).
- Actors: the per-process state (pycaffe and OpenCV nets, the MTCNN detector) stays loaded in Ray
  actors between tasks: one actor per GPU of the cluster (num_gpus=1) where it has GPUs, else one per
  CPU, each running one thread of the BLAS and OpenCV (the stages' own thread settings).
- Paths: each actor works in the caller's working directory, so paths mean what they mean here:
  every node must see the inputs (and preprocess's output folder) at the same paths, on a shared
  file system for one. An actor that does not see them stops the run with one line naming its node.
- Faults: an actor whose process dies (killed, out of memory) is restarted, and the task it was
  running is run again from scratch, up to TASK_RETRIES times. Outputs are written atomically
  (temporary file, then rename), so a killed try leaves nothing half-written behind.
- Progress: tasks report frames to a counter actor, which the caller's tqdm bars read: they show
  the whole cluster's progress.
"""

import collections
import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

from emotiw.errors import UserError

TASK_RETRIES = 2  # tries after the first for a task whose worker died
PROGRESS_SECONDS = 0.2  # how often the bars are brought up to date
CONNECT_SECONDS = 5  # for the head node to answer the reachability probe
LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's local-only mode (private_cluster)
RAY_HELP = ("run the clips on a Ray cluster, one task per clip: ADDRESS (HOST:6379) is its head node; "
            "without it, the cluster RAY_ADDRESS names or a new one on this machine. Every node must see "
            "the inputs and outputs at the same paths (README: More than one machine)")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed: pip install 'emotiw[ray]'") from None
    return ray


def check_reachable(target):
    """One line instead of Ray's endless wait when nothing listens at HOST:PORT."""
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray takes the head node's HOST:PORT (e.g. 10.0.0.1:6379), not {target!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise UserError(f"cannot reach the Ray cluster at {target} ({reason}); start it on that machine with "
                        f"`ray start --head --port={port}`, or check the address and that the port is open") from None


class Cluster:
    """A Ray cluster to run a stage's tasks on: `with Cluster(address) as cluster: cluster.run(...)`.

    The constructor only checks (Ray installed, the address reachable), so that a stage fails at
    once; entering connects, and `size` is then the number of tasks run at a time. `needs`: paths
    every worker must see (the input folder, the output folder, net files)."""

    def __init__(self, address=True, needs=()):
        self.ray = import_ray()
        self.address = None if address is True else str(address)
        self.needs = [str(Path(path).absolute()) for path in needs]
        target = self.address or os.environ.get("RAY_ADDRESS")
        if target and target not in ("auto", "local"):
            check_reachable(target)
        self.opened = False
        self.size = 0
        self.options = {}

    def __enter__(self):
        ray = self.ray
        if not ray.is_initialized():
            ours = signal.getsignal(signal.SIGTERM)
            try:
                with self.private_cluster() as private:
                    ray.init(address=self.address, **private)
            except ConnectionError as error:
                where = self.address or os.environ.get("RAY_ADDRESS") or "this machine"
                raise UserError(f"cannot connect to the Ray cluster at {where}: {str(error).splitlines()[0]}; "
                                "start one with `ray start --head`, or give its head node's HOST:PORT") from None
            if ours is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, ours)  # ray.init's own exits 15 with a stack dump
            self.opened = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.size = gpus or int(resources.get("CPU", 0))
        self.options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        if self.size < 1:
            self.__exit__(None, None, None)
            raise UserError("the Ray cluster has no CPU or GPU to run clips on; add a node with "
                            "`ray start --address HEAD:6379`")
        return self

    @contextlib.contextmanager
    def private_cluster(self):
        """Yields ray.init's arguments. A cluster that ray.init starts on this machine is private:
        it listens on 127.0.0.1 only, and keeps its files under the emotiw cache instead of a
        world-writable /tmp/ray. An address the user gives (or RAY_ADDRESS) is taken as it is."""
        if self.address or os.environ.get("RAY_ADDRESS"):
            yield {}
            return
        from ray._private import ray_constants

        from emotiw.formats.files import cache_root

        temp = cache_root() / "ray"
        temp.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Ray turns a node address of 127.0.0.1 into the machine's own IP, and binds its gRPC
        # servers to all interfaces unless the node is on loopback. Its local-only mode (what it
        # does on macOS and Windows) keeps the node, and so every server, on 127.0.0.1; the
        # processes it starts read the variable, this one the constant.
        previous = os.environ.get(LOCAL_ONLY_VARIABLE), ray_constants.ENABLE_RAY_CLUSTER
        os.environ[LOCAL_ONLY_VARIABLE], ray_constants.ENABLE_RAY_CLUSTER = "0", False
        try:
            yield {"_temp_dir": str(temp.resolve()), "include_dashboard": False}
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = previous[1]
            if previous[0] is None:
                os.environ.pop(LOCAL_ONLY_VARIABLE, None)
            else:
                os.environ[LOCAL_ONLY_VARIABLE] = previous[0]

    def __exit__(self, *exc):
        if self.opened:
            self.ray.shutdown()
            self.opened = False

    def run(self, function, calls, labels, progress=None):
        """Yields (index, function(*calls[index], progress=...)) as each call finishes; `labels` name
        the calls in error messages, and `progress` gets the cluster's frame counts as they grow (a
        tqdm bar's update)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self.ray
        # the counter on this node, which the run cannot outlive anyway
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        counter = ray.remote(num_cpus=0, scheduling_strategy=here)(TaskCounter).remote()
        worker = ray.remote(max_restarts=-1, max_task_retries=TASK_RETRIES, **self.options)(Worker)
        actors = [worker.remote(os.getcwd()) for _ in range(min(self.size, len(calls)))]
        try:
            nodes = self.start(actors)
            pending, idle, running = collections.deque(range(len(calls))), list(range(len(actors))), {}
            counted = 0
            while pending or running:
                while idle and pending:
                    index, actor = pending.popleft(), idle.pop()
                    running[actors[actor].run.remote(counter, index, function, calls[index])] = index, actor
                done, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_SECONDS)
                if progress is not None:
                    total = ray.get(counter.total.remote())
                    progress(total - counted)
                    counted = total
                for ref in done:
                    index, actor = running.pop(ref)
                    idle.append(actor)
                    yield index, self.result(ref, labels[index], nodes[actor])
        finally:  # also on Ctrl-C or an error: the tasks still running stop now
            for actor in [*actors, counter]:
                ray.kill(actor, no_restart=True)

    def start(self, actors):
        """Each actor's node, once it is up and sees every needed path."""
        ray = self.ray
        try:
            return ray.get([actor.check.remote(self.needs) for actor in actors])
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, UserError):
                raise UserError(str(error.cause)) from None
            raise
        except ray.exceptions.RayActorError as error:
            raise UserError(f"a Ray worker could not start ({str(error).strip().splitlines()[0]}); every node needs "
                            "emotiw installed as here (make install), and its `ray start` run from that .venv") from None

    def result(self, ref, label, node):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, UserError):
                raise UserError(f"{label} (on {node}): {cause}") from None
            if isinstance(cause, OSError):  # a full disk, a read-only folder: the stage says how to fix it
                raise cause from None
            raise
        except ray.exceptions.RayActorError:
            raise UserError(f"{label}: the Ray worker running it on {node} died, and so did its {TASK_RETRIES} "
                            "tries again (killed, or out of memory: see the Ray logs on that node); run the same "
                            "command again") from None


class TaskCounter:
    """Units done per task, summed for the bars; a task run again starts its count anew."""

    def __init__(self):
        self.counts = {}

    def restart(self, key):
        self.counts[key] = 0

    def add(self, key, count):
        self.counts[key] += count

    def total(self):
        return sum(self.counts.values())


class Worker:
    """One Ray actor: a process that keeps its nets (and MTCNN detector) loaded between tasks."""

    def __init__(self, cwd):
        import ray

        from emotiw.caffe.runtime import reusing_nets
        from emotiw.execution.workers import limit_threads

        self.node = ray.util.get_node_ip_address()
        self.cwd = cwd
        if os.path.isdir(cwd):  # else check() says so
            os.chdir(cwd)
        limit_threads(1)
        self.nets = contextlib.ExitStack()
        self.nets.enter_context(reusing_nets())  # for the actor's life: load_net gives back loaded nets

    def check(self, needs):
        for path in (self.cwd, *needs):
            if not os.path.exists(path):
                raise UserError(f"the Ray worker on {self.node} does not see {path}; every node needs the inputs and "
                                "outputs at the same paths as this machine (a shared file system such as NFS)")
        return self.node

    def run(self, counter, key, function, args):
        counter.restart.remote(key)  # before any add: Ray runs one caller's calls in order
        return function(*args, progress=lambda count: counter.add.remote(key, count))
