"""PyTorch reference of an exported atomo_jax model (torch + diffusers + transformers only; never jax).

`model.AtomoUNet.from_export(DIR)` loads the UNet of `python -m atomo_jax.export` strictly;
`sample.load_pipeline(DIR)` + `sample.image_to_video(...)` (or `python -m atomo_jax.torch_ref.sample`) sample videos.
"""
