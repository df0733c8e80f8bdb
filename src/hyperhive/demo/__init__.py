"""The bundled scripted model: an offline Messages API that plays deterministic scripts."""
