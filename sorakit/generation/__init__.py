"""Generation: one model and one sampler for every mode, cron-safe batches, toy-world scoring.

    pipeline.py   load_pipeline(DIR): the DiT, VAE, text encoder and diffusion settings of a model
    sampling.py   generate_latents(...): latents for prompts, with given latent frames
    modes.py      GenerationConfig; text_to_video, image_to_video, extend, interpolate, edit
    outputs.py    MP4 + sidecar JSON + contact sheet, written atomically; the commands' file-level calls
    batch.py      `sorakit sample --prompts FILE --out-dir DIR`: resumable, locked, with a gallery
    expand.py     prompt expansion into the training captions' style
    toyscore.py   the toy world's pixel scoring rules, and seam ratios
    evaluate.py   `sorakit eval toyworld`

Nothing is imported here, so `import sorakit.generation.toyscore` stays light.
"""
