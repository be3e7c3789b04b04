"""specquant.diagnostics: measurements that read weights and statistics and change nothing.

* :mod:`specquant.diagnostics.analyze`  per-layer spectra, statistics, RTN error against the
  weight bounds (``specquant.analyze(model)`` is :func:`specquant.diagnostics.analyze.analyze`);
* :mod:`specquant.diagnostics.bounds`   the end-to-end output-error bound and the chain check;
* :mod:`specquant.diagnostics.sweeps`   κ per layer and the frame ΣΔ error-vs-redundancy sweep
  (what the run-folder plots show).

The submodules are imported by name; nothing is re-exported here, so that
``specquant.diagnostics.analyze`` stays the module and is never shadowed by its function.
"""
