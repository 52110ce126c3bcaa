"""Router families, one file each; `ROUTERS` maps the config key to the class."""

from megamoe.moe.routers.base import MegamoeRouter, RouterOutput
from megamoe.moe.routers.topk import TopKSoftmaxRouter

ROUTERS = {"topk": TopKSoftmaxRouter}

__all__ = ["MegamoeRouter", "RouterOutput", "ROUTERS", "TopKSoftmaxRouter"]
