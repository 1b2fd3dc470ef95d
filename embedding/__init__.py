"""The one embedding step: an item in, its named vectors, transcript or error out.

Every path that embeds runs it: ``/encode/*`` and ``/v1/embeddings`` (a model's step inside its
encoder deployment), ``POST /items`` and server jobs (the item step over the deployments), the
local and Ray Data engines of bulk jobs (the item step over models in the process). So the
cache key, the "not cacheable" rule and the vector names exist once, and a vector never
depends on the path that made it.

- ``model``: ``ModelStep``, one model's share: preprocess, cache lookup, a forward pass over
  the misses (injected: Serve's batch queue, or the encoder called in the process), cache put.
- ``item``: ``ItemEmbedder``, one item through every model that gives it a vector (its kind's
  towers, then its caption or transcript through the text towers), over any ``Encoders``.
"""

from mmembed.embedding.item import Encoders, Item, ItemEmbedder, LocalEncoders
from mmembed.embedding.model import Forward, Media, ModelStep, encoded, prepare

__all__ = ["Encoders", "Forward", "Item", "ItemEmbedder", "LocalEncoders", "Media", "ModelStep", "encoded", "prepare"]
