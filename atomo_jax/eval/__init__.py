"""AIGCBench-style metrics of generated videos (`python -m atomo_jax.eval`): SSIM/MSE of the first frame to the
input image, CLIP image-video / adjacent-frame / text-video similarity, and a dense-optical-flow motion score."""
