"""Teacher workers on Ray: pair and target generation into WebDataset shards with a manifest.

`format`, `manifest` and `generate` are plain Python/torch (storage is `raydistill.storage`);
`pool` (the Ray actor pool) and `reader.ray_dataset` import Ray.
"""
