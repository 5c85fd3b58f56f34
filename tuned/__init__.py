"""
The tuned codebook search, which a learner may skip: the same ids as codebook.search, found faster.

    from tuned import use_tuned_search
    use_tuned_search(model)   # every CodebookLayer in model: the tuned search, LayerNorm and scatter

tiled.py: per-device plans (PLANS, the one place where a device's choices live), tiles of scores with a
running top-k, block maxima, a LayerNorm whose backward keeps less; triton_kernels.py: fused Triton kernels
that never write the scores (a GPU's, off until timed there). The scripts call use_tuned_search where they
build a model, as nanoGPT calls torch.compile; without it the layer runs codebook.py's plain search.
"""

from tuned import tiled


def use_tuned_search(model):
    """Give every codebook.CodebookLayer in model (a module, or a layer itself) the tuned search, LayerNorm
    and gradient scatter of tiled.py. The same ids and gradients as the plain ones; returns model."""
    from codebook import CodebookLayer
    for m in model.modules():
        if isinstance(m, CodebookLayer):
            m.search, m.layer_norm, m.scatter_rows = tiled.search, tiled.group_layer_norm, tiled.scatter_rows
    return model
