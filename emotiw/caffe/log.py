"""Reading Caffe's training log as it is written: iterations, losses, learning rate, test scores."""

import math
import re
from dataclasses import dataclass, field

ITERATION = re.compile(r"Iteration (\d+) \(.*?\), loss = (\S+)")
LEARNING_RATE = re.compile(r"Iteration (\d+), lr = (\S+)")
TRAIN_OUTPUT = re.compile(r"Train net output #\d+: (\S+) = (\S+)")
TESTING = re.compile(r"Iteration (\d+), Testing net")
TEST_OUTPUT = re.compile(r"Test net output #\d+: (\S+) = (\S+)")
SNAPSHOT = re.compile(r"Snapshotting (?:to binary proto file|solver state to binary proto file) (\S+)")


def _number(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class TrainingCurves:
    """Rows of (iteration, name, value) gathered from the log; `feed` takes one line at a time."""
    train: list = field(default_factory=list)      # (iteration, name, value); "total_loss" is smoothed
    test: list = field(default_factory=list)       # (iteration, name, value)
    learning_rate: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)
    iteration: int = 0
    _testing_at: int = None

    def feed(self, line):
        """Returns the kind of event the line carried ("iteration", "test", "lr", "snapshot") or None."""
        if match := TESTING.search(line):
            self._testing_at = int(match.group(1))
            return None
        if match := TEST_OUTPUT.search(line):
            at = self._testing_at if self._testing_at is not None else self.iteration
            self.test.append((at, match.group(1), _number(match.group(2))))
            return "test"
        if match := ITERATION.search(line):
            self.iteration = int(match.group(1))
            self.train.append((self.iteration, "total_loss", _number(match.group(2))))
            return "iteration"
        if match := TRAIN_OUTPUT.search(line):
            self.train.append((self.iteration, match.group(1), _number(match.group(2))))
            return "train"
        if match := LEARNING_RATE.search(line):
            self.learning_rate.append((int(match.group(1)), _number(match.group(2))))
            return "lr"
        if match := SNAPSHOT.search(line):
            self.snapshots.append(match.group(1))
            return "snapshot"
        return None

    def latest(self, rows, name):
        values = [value for _, row_name, value in rows if row_name == name]
        return values[-1] if values else None

    def best_test(self, name="accuracy"):
        """(iteration, value) of the best test score called `name`, or None."""
        scores = [(value, iteration) for iteration, row_name, value in self.test
                  if row_name == name and not math.isnan(value)]
        if not scores:
            return None
        value, iteration = max(scores, key=lambda item: (item[0], -item[1]))
        return iteration, value

    def add_row(self, iteration, phase, name, value):
        """Takes back one row of `rows()`, as an earlier run wrote it to curves.csv."""
        if phase == "test":
            self.test.append((iteration, name, value))
        elif name == "lr":
            self.learning_rate.append((iteration, value))
        else:
            self.train.append((iteration, name, value))

    def rows(self):
        """All values as CSV rows: iteration, phase, name, value."""
        out = [(i, "train", name, v) for i, name, v in self.train]
        out += [(i, "train", "lr", v) for i, v in self.learning_rate]
        out += [(i, "test", name, v) for i, name, v in self.test]
        return sorted(out, key=lambda row: (row[0], row[1], row[2]))
