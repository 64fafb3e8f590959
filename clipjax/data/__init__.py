"""The one data layer: source specs (sources, wds_source, tfds_source, arrayrecord), the grain
pipeline (pipeline, stages), CLIP preprocessing (transforms), video datasets and frame
sampling (video_sources, video) and the built-in synthetic data."""
