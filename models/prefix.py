"""Where prefix sharing lived before issue 13; its functions now sit beside their callers.

``models.kv_cache`` holds the shared pieces (``rope_positions``, ``prefill_shared``,
``kv_cache_available``), ``models.sampling`` the sampling loops (``sample_shared_prefix``,
``sample_shared_first_image``), ``models.logprobs`` the differentiable pass. This file only keeps
the old import paths working.
"""

from models.kv_cache import kv_cache_available, prefill_shared, rope_positions
from models.sampling import sample_shared_first_image, sample_shared_prefix

__all__ = ["kv_cache_available", "prefill_shared", "rope_positions", "sample_shared_first_image",
           "sample_shared_prefix"]  # fmt: skip
