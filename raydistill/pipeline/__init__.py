"""The main job: teacher -> classifier -> students -> evaluation -> report, resumable by lineage."""
