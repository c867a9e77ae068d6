"""``gradcam-service evaluate``: which layer and method explain a model best, on your images.

Every image of a folder is explained with every (layer, method) asked for, for its labelled
class (else the predicted one), and each map is measured:

- where the labels file gives boxes or a mask for an image: the **pointing game** (Zhang et
  al. 2016: whether the map's peak on the image falls on the object, within
  ``pointing_tolerance`` pixels) and the **energy in box** (Score-CAM's energy-based pointing
  game: the share of the map's sum on the image that lies on the object);
- the faithfulness scores asked for (:mod:`service.engine.faithfulness.scores`);
- the time per image of the explanation and of the scores, after one untimed warm-up call per
  (layer, method): a first call's one-time costs would otherwise count as the method's.

The (layer, method) pairs are ranked by their mean over the images, and the report is written
as Markdown and as a self-contained HTML page with thumbnails.

Results are appended to ``results.jsonl`` in the output folder after each batch of images, so
a run stopped by Ctrl-C writes its report from what it has, and the same command run again
carries on where it stopped (``--fresh`` starts over): an image is done once every (layer,
method) has its record, images that could not be read are tried again, and an unfinished last
line (the process killed, the disk full) is dropped.

One job a module:

- :mod:`~service.local.evaluate.options`: what to compare, and how (:class:`EvaluateOptions`);
- :mod:`~service.local.evaluate.annotations`: the labels file (classes, boxes, masks) and the
  object's pixels on an image;
- :mod:`~service.local.evaluate.localisation`: the pointing game and the energy in box;
- :mod:`~service.local.evaluate.store`: ``results.jsonl``, appended per batch and resumed;
- :mod:`~service.local.evaluate.thumbnails`: the overlays the HTML page shows, with the labelled
  boxes and the map's peak drawn;
- :mod:`~service.local.evaluate.runner`: the batch loop, Ctrl-C, what a folder holds to
  evaluate;
- :mod:`~service.local.evaluate.ranking`: the measures' means by (layer, method), ranked;
- :mod:`~service.local.evaluate.report`: the ranking as Markdown and as an HTML page.

The command's parser and options are :mod:`service.commands.evaluate`.
"""
