"""The one data layer: source specs (sources, wds_source, tfds_source, arrayrecord), the grain
pipeline (pipeline, stages), CLIP preprocessing (transforms) and the built-in synthetic data."""
