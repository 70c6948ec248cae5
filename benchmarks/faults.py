"""Fault-tolerance report: kill points recovered identically, bad inputs answered cleanly.

Runs the crash tests (tests/test_crash_resume.py) and the bad-input catalogue
(tests/test_bad_inputs.py) under pytest and counts, per category, the cases tried and passed.

    python benchmarks/faults.py            # writes benchmarks/results/faults.{json,md}
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = {  # test function -> what one case of it shows
    "test_sigkill_then_resume_is_identical": "SIGKILL points resumed to an identical result",
    "test_ctrl_c_checkpoints_mid_epoch_and_resumes_identically": "Ctrl-C mid-epoch, resumed identically",
    "test_sigterm_stops_cleanly": "SIGTERM stops with a checkpoint",
    "test_damaged_latest_checkpoint_falls_back_to_the_previous_one": "tampered latest checkpoint, resumed identically",
    "test_a_damaged_latest_checkpoint_never_replaces_the_good_one":
        "damaged latest checkpoint set aside: a crash in the next save still leaves a good one",
    "test_disk_full_while_checkpointing_keeps_the_previous_checkpoint": "disk full mid-run, resumed identically",
    "test_divergence_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr": "NaN loss: checkpoint kept, resumed",
    "test_forced_resume_keeps_a_finished_dense_baseline_and_refuses_before_writing":
        "--force: finished dense baseline kept, impossible settings refused before any write",
    "test_force_refuses_settings_the_run_has_already_acted_on":
        "--force: a rounds or rewind-epoch change the run already acted on, refused before any write",
    "test_records_lost_from_metrics_jsonl_are_restored_from_the_checkpoint":
        "metrics.jsonl cut short or deleted: its records restored from the checkpoint, resumed identically",
    "test_a_config_yaml_edited_by_hand_is_judged_against_the_checkpoint":
        "config.yaml edited by hand: judged against the checkpoint's settings, as a flag would be",
    "test_bad_input_is_one_clean_line": "bad inputs answered with one clean line, exit 2, run dirs unchanged",
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        "tests/test_crash_resume.py", "tests/test_bad_inputs.py"], cwd=ROOT, check=False)
        cases = ElementTree.parse(report).getroot().iter("testcase")
        counts = {name: {"tried": 0, "passed": 0, "cases": []} for name in CATEGORIES}
        for case in cases:
            match = re.fullmatch(r"(\w+)(?:\[(.*)\])?", case.get("name", ""))
            if match is None or match.group(1) not in counts:
                continue
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
            entry = counts[match.group(1)]
            if outcome == "skipped":
                continue
            entry["tried"] += 1
            entry["passed"] += outcome == "passed"
            entry["cases"].append({"case": match.group(2) or match.group(1), "outcome": outcome})
    lines = ["# Fault tolerance", "", "Command: `python benchmarks/faults.py` (runs tests/test_crash_resume.py and "
             "tests/test_bad_inputs.py).", "", "| what | tried | passed |", "|---|---|---|"]
    for name, label in CATEGORIES.items():
        lines.append(f"| {label} | {counts[name]['tried']} | {counts[name]['passed']} |")
    kill = counts["test_sigkill_then_resume_is_identical"]
    lines += ["", "Kill points: " + ", ".join(c["case"] for c in kill["cases"]) + ".", "",
              "Bad inputs: " + "; ".join(c["case"] for c in counts["test_bad_input_is_one_clean_line"]["cases"]) + ".",
              ""]
    write_results("faults", {"machine": machine(), "categories": counts}, "\n".join(lines))


if __name__ == "__main__":
    main()
