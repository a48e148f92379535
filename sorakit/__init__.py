"""sorakit: a Sora-style text-to-video toolkit, from raw videos to generated videos."""

__version__ = "0.1.0"
