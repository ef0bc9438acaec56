from dalle_ar.model.kv_cache import KVCache
from dalle_ar.model.transformer import DalleTransformer

__all__ = ["DalleTransformer", "KVCache"]
