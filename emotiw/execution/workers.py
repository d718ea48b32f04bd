"""Worker processes of a local pool: their share of the cores, their end with the main process, and
the pool's run and teardown (emotiw.execution.Executor uses them)."""

import os
import queue
import signal

from emotiw.caffe.env import BLAS_THREADS_VARIABLES
from emotiw.errors import UserError
from emotiw.processes import die_with_parent

POLL_SECONDS = 0.2  # how often the bars are brought up to date while workers run

_worker_progress = None  # in a pool worker: sends counts to the main process's bars


def limit_threads(threads, keep_set=True):
    """This process's share of the cores: N processes each running OpenCV's, the BLAS's and OpenMP's
    all-core pools oversubscribe the machine (bench/NOTES.md). OpenBLAS, MKL and OpenMP read their
    variables when Caffe loads them, so this comes before the first net; `keep_set`: a value the user
    set is kept. OpenMP's threads are Caffe's layer loops', oneDNN's and (OpenBLAS's OpenMP build, MKL's
    GNU layer) the BLAS's own (caffe_patches/0008), so a BLAS thread count the user set is OpenMP's too,
    unless OMP_NUM_THREADS is set as well."""
    import cv2

    values = {variable: str(threads) for variable in (*BLAS_THREADS_VARIABLES.values(), "OMP_NUM_THREADS")}
    user_blas = next((os.environ[variable] for variable in BLAS_THREADS_VARIABLES.values() if variable in os.environ),
                     None)
    if keep_set and user_blas:
        values["OMP_NUM_THREADS"] = user_blas
    for variable, value in values.items():
        if keep_set:
            os.environ.setdefault(variable, value)
        else:
            os.environ[variable] = value
    cv2.setNumThreads(threads)


def init_worker(progress_queue, threads):
    """A pool worker: dies with the main process, even a killed one (the pool starts workers from
    the main thread, whose end is what PR_SET_PDEATHSIG watches), leaves Ctrl-C to it, runs its share
    of the cores and reports progress through `progress_queue`."""
    global _worker_progress
    import multiprocessing

    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before die_with_parent took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends Ctrl-C to every process of the run
    _worker_progress = progress_queue.put
    limit_threads(threads)


def call_in_worker(function, arguments):
    return function(*arguments, progress=_worker_progress)


def run_in_pool(function, calls, workers, report):
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn: each worker imports Caffe and loads its own nets, nothing is shared by fork
    context = multiprocessing.get_context("spawn")
    counts = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(counts, threads))
    try:
        running = {pool.submit(call_in_worker, function, call): index for index, call in enumerate(calls)}
        while running:
            done, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            try:
                while True:
                    report(counts.get_nowait())
            except queue.Empty:
                pass
            for future in done:
                yield running.pop(future), future.result()
    except BrokenProcessPool:
        stop_pool(pool)
        raise UserError("a worker process ended abruptly (killed, by the out-of-memory killer for one); run the "
                        "same command again to go on from the finished clips, with fewer --workers if memory "
                        "is short") from None
    except BaseException:  # Ctrl-C, SIGTERM, a full disk, a consumer that stops: stop now
        stop_pool(pool)
        raise
    pool.shutdown()


def stop_pool(pool):
    """Cancels the tasks not started and ends the workers at once. (Python 3.14's
    pool.terminate_workers; 3.11 keeps the processes in _processes.)"""
    processes = list(pool._processes.values())
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if manager is not None:
        # Python 3.11's exit hook writes to the pipe this thread closes as it ends (fixed in 3.12):
        # a run stopped by SIGTERM could print that race's traceback after its one line
        manager.join(5)
