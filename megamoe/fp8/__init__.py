"""FP8 expert GEMMs with per-expert scaling: formats and quantisation (`formats`), recipes
(`recipes`), FP8 GEMMs on `torch._scaled_mm` (`gemm`), the autograd grouped linear (`linear`),
scaling state (`state`) and the GEMM back ends (`backends`)."""

from megamoe.fp8.formats import E4M3, E5M2, FORMATS, Format, Quantised, quantise
from megamoe.fp8.gemm import emulated_matmul, scaled_matmul
from megamoe.fp8.linear import FP8Call, fp8_grouped_linear
from megamoe.fp8.recipes import RECIPES, Recipe, make_recipe
from megamoe.fp8.state import FP8ScalingState

__all__ = ["E4M3", "E5M2", "FORMATS", "FP8Call", "FP8ScalingState", "Format", "Quantised",
           "RECIPES", "Recipe", "emulated_matmul", "fp8_grouped_linear", "make_recipe",
           "quantise", "scaled_matmul"]
