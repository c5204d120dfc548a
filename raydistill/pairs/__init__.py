"""Teacher workers on Ray: pair and target generation into WebDataset shards with a manifest.

`format`, `store`, `manifest` and `generate` are plain Python/torch; `pool` (the Ray actor pool) and
`reader.ray_dataset` import Ray.
"""
