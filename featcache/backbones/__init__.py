"""Backbones: which network turns an image into a feature vector, and with which weights.

- :mod:`~featcache.backbones.registry`: the backbones by name
  (:func:`create_backbone`, :func:`get_entry`, :func:`auto_weights`,
  :func:`load_tensors` for any user-supplied tensor file);
- :mod:`~featcache.backbones.spec`: :class:`PreprocessSpec`, how an image
  becomes the network's input, recorded in every cache;
- :mod:`~featcache.backbones.weights`: :class:`WeightsRef`, what
  ``--weights`` means and its recorded id;
- :mod:`~featcache.backbones.extractor`: the torch module (uint8 pixels in,
  features out) shared by extraction and fine-tuning;
- :mod:`~featcache.backbones.costs`: ``featcache models``, parameters, FLOPs
  and measured speed per backbone.
"""
