"""What `preprocess` says of its clips: the subject's coverage per clip, the problems, the summary."""

import sys

from emotiw.inputs import Problem


def print_problem(problem):
    from tqdm import tqdm

    tqdm.write(f"emotiw preprocess: {problem.split}/{problem.clip or '-'}: {problem.message}", file=sys.stderr)


def clip_coverage(rows, items):
    """Per (split, clip) of `items` with rows: frames, frames with the subject, shots, shots with it."""
    mine = {(i.split, i.clip) for i in items}
    coverage = {}
    for row in rows:
        key = row["split"], row["clip"]
        if key in mine:
            clip = coverage.setdefault(key, {"frames": 0, "faces": 0, "shots": set(), "shots_with_face": set()})
            clip["frames"] += 1
            clip["shots"].add(row["shot"])
            if row["detected"] == "1":
                clip["faces"] += 1
                clip["shots_with_face"].add(row["shot"])
    for clip in coverage.values():
        clip["shots"], clip["shots_with_face"] = len(clip["shots"]), len(clip["shots_with_face"])
        clip["coverage_percent"] = round(100.0 * clip["faces"] / clip["frames"], 2)
    return coverage


def coverage_problems(coverage, items, min_coverage):
    """A line for each clip without any face, and with min_coverage for each clip below it."""
    problems = []
    for item in items:
        clip = coverage.get((item.split, item.clip))
        if clip is None:
            continue
        if clip["faces"] == 0:
            shots = f" ({clip['shots']} shots)" if clip["shots"] > 1 else ""
            problems.append(Problem(item.split, item.clip, str(item.source),
                                    f"no face found in any of its {clip['frames']} frames{shots}"))
        elif min_coverage is not None and clip["coverage_percent"] < min_coverage:
            problems.append(Problem(item.split, item.clip, str(item.source),
                                    f"the subject is in {clip['coverage_percent']}% of the frames "
                                    f"({clip['faces']} of {clip['frames']}; {clip['shots_with_face']} of "
                                    f"{clip['shots']} shots), below --min-coverage {min_coverage}%"))
    return problems


def summarise(items, coverage, processed, problems, elapsed):
    frames = sum(clip["frames"] for clip in coverage.values())
    faces = sum(clip["faces"] for clip in coverage.values())
    frames_processed = sum(r.frames for r in processed)
    return {
        "clips": len(items),
        "clips_processed_now": len(processed),
        "clips_failed": sum(1 for r in processed if r.error),
        "clips_without_face": sum(1 for clip in coverage.values() if clip["faces"] == 0),
        "errors": len(problems),
        "frames": frames,
        "faces": faces,
        "faces_found_percent": round(100.0 * faces / frames, 2) if frames else 0.0,
        "elapsed_s": round(elapsed, 2),
        "frames_per_s": round(frames_processed / elapsed, 2) if elapsed > 0 else 0.0,
        "coverage_percent": {f"{split}/{clip}": figures["coverage_percent"]
                             for (split, clip), figures in sorted(coverage.items())},
    }



COVERAGE_LINES = 20  # clips whose coverage is printed, lowest first


def print_summary(summary, coverage, out):
    shown = sorted((figures["coverage_percent"], key) for key, figures in coverage.items())
    for percent, (split, clip) in shown[:COVERAGE_LINES]:
        figures = coverage[split, clip]
        print(f"  {split}/{clip}: subject in {percent}% of {figures['frames']} frames "
              f"({figures['shots_with_face']} of {figures['shots']} shots)")
    if len(shown) > COVERAGE_LINES:
        print(f"  ... {len(shown) - COVERAGE_LINES} more clips (the lowest coverage first), all in {out / 'summary.json'}")
    print(f"clips {summary['clips']} ({summary['clips_processed_now']} processed now, "
          f"{summary['clips_failed']} failed, {summary['clips_without_face']} without a face, "
          f"{summary['errors']} errors); "
          f"frames {summary['frames']}, faces found {summary['faces']} ({summary['faces_found_percent']}%); "
          f"{summary['elapsed_s']} s, {summary['frames_per_s']} frames/s -> {out}")


