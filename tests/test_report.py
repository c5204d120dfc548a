"""The report's goals (a pipeline's `goals:`): each row a goal names, at the evaluation's w or at
each w of its guidance sweep, held against the teacher or plain DDIM at the same w."""

import pytest

from raydistill.config import Goal
from raydistill.pipeline.report import fidelity, goals


def row(name, steps, nfe, fid, w=1.0, to_teacher=None, sweep=False):
    return {"name": name, "steps": steps, "nfe": nfe, "fid": fid, "w": w,
            "fid_to_teacher": fid / 10 if to_teacher is None else to_teacher,
            **({"sweep": True} if sweep else {})}


ROWS = [row("teacher", 64, 128, 1.0), row("ddim", 1, 2, 3.0), row("ddim", 4, 8, 1.5, to_teacher=0.2),
        row("ddim", 8, 16, 1.2, to_teacher=0.05), row("progressive", 4, 4, 1.1, to_teacher=0.09),
        row("progressive", 2, 2, 1.6), row("kd", 1, 1, 1.04),
        row("teacher", 64, 128, 2.0, w=4.0, sweep=True),
        row("ddim", 16, 32, 2.5, w=4.0, to_teacher=0.03, sweep=True),
        row("guided", 64, 64, 2.2, w=4.0, to_teacher=0.02, sweep=True)]


def test_a_goal_holds_each_row_it_names_against_the_teacher_and_plain_ddim():
    found = goals(ROWS, [Goal(row="progressive", steps=4, fid_vs_teacher=1.15, beats_ddim=True,
                              closer_than_ddim=8)])
    assert [(g["row"], g["steps"], g["goal"]) for g in found] == [
        ("progressive", 4, "FID <= 1.15x the teacher's"),
        ("progressive", 4, "FID below plain DDIM's at 4 steps (8 NFE)"),     # fewest NFE >= 4
        ("progressive", 4, "FID to the teacher's samples below plain DDIM's at 8 steps")]
    assert [g["ratio"] for g in found] == pytest.approx([1.1, 1.1 / 1.5, 0.09 / 0.05])
    assert [g["met"] for g in found] == [True, True, False]


def test_every_students_row_and_the_guidance_sweep():
    found = goals(ROWS, [Goal(row="*", beats_ddim=True)])
    assert [(g["row"], g["steps"]) for g in found] == [("progressive", 4), ("progressive", 2),
                                                       ("kd", 1)]
    assert [g["met"] for g in found] == [True, True, True]       # 1.6 < 3.0 at 2 NFE, 1.04 < 3.0
    swept = goals(ROWS, [Goal(row="guided", sweep=True, fid_vs_teacher=1.05,
                              closer_than_ddim=16)])
    assert [(g["w"], g["ratio"], g["met"]) for g in swept] == [
        (4.0, pytest.approx(1.1), False), (4.0, pytest.approx(0.02 / 0.03), True)]
    assert goals(ROWS, [Goal(row="kd", fid_vs_teacher=1.05)])[0]["met"]


def test_the_floor_is_no_students_row_and_sets_the_scale_of_fidelity():
    """The floor row (the teacher at a second seed) is held to no goal, and each 4-step student's
    FID to the teacher's samples is stated against it as well as against plain DDIM's."""
    floored = [*ROWS[:1], row("floor", 64, 128, 1.03, to_teacher=0.06), *ROWS[1:]]
    assert [g["row"] for g in goals(floored, [Goal(row="*", fid_vs_teacher=2.0)])] == [
        "progressive", "progressive", "kd"]
    [found] = fidelity(floored, {"progressive", "kd"})
    assert found["ratio"] == pytest.approx(0.09 / 0.2)
    assert (found["floor_fid_to_teacher"], found["floor_ratio"]) == (0.06, pytest.approx(1.5))
    assert "floor_ratio" not in fidelity(ROWS, {"progressive"})[0]
