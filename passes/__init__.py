"""FX graph passes of the agpe backend, installed as ``agpe_compile.passes``.

In pipeline order: ``match_linears`` (find ``x @ W^T + b``), ``decide_layers`` (rewrite or
say why not), ``rewrite_linears`` (copy the graph and call ``agpe::sparse_linear``).
"""
