"""Running Caffe's binaries (caffe, extract_features, convert_imageset, compute_image_mean) the same
way everywhere: the tool found in the venv, glog to a log file or captured, one line when it fails,
and never outliving emotiw (each child gets SIGTERM when emotiw ends, even by SIGKILL)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from emotiw.caffe.env import caffe_tool
from emotiw.errors import UserError
from emotiw.processes import die_with_parent


def first_fatal_line(log_text):
    """Caffe's reason for stopping: its first glog FATAL or 'Check failed' line, else the last line."""
    lines = log_text.strip().splitlines()
    for line in lines:
        if (line.startswith("F") and "] " in line) or "Check failed" in line:
            return line.split("] ", 1)[-1]
    return lines[-1] if lines else "no output"


def tool_command(name, *args):
    return [caffe_tool(name), *map(str, args)]


def run_tool(name, *args):
    """Runs a tool to completion with its output captured; a failure is a UserError with Caffe's reason."""
    command = tool_command(name, *args)
    env = dict(os.environ, GLOG_logtostderr="1")  # else glog writes files and links into /tmp
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=die_with_parent, env=env)
    if result.returncode != 0:
        reason = first_fatal_line(result.stderr or result.stdout)
        raise UserError(f"{name} failed (exit {result.returncode}): {reason}")
    return result


def start_logged(command, log_level="1"):
    """Starts a tool whose glog lines (stdout and stderr together) are read as they come."""
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel=log_level)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            bufsize=1, preexec_fn=die_with_parent)


def run_logged(command, log_path, on_line=None, log_level=None):
    """Runs a tool, writing every line to `log_path` and handing it to `on_line`; returns the exit
    status and the text it logged (for first_fatal_line)."""
    level = log_level or os.environ.get("GLOG_minloglevel", "1")
    print(f"running {shlex.join(map(str, command))}", file=sys.stderr)
    lines = []
    process = start_logged(command, level)
    try:
        with open(Path(log_path), "w") as log:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if on_line is not None:
                    on_line(line, process)
        return process.wait(), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
