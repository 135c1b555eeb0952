"""Deployment: export a searched student, run it on images, submit searches to a Ray cluster.

* :mod:`rkd.deploy.export` - ``rkd export``: one student of a finished search as
  safetensors (+ spec), ONNX and TorchScript, with a model card.
  It picks the student (:mod:`rkd.deploy.select`), wraps it (:mod:`rkd.deploy.graphs`), writes
  the files (:mod:`rkd.deploy.writers`) and the card (:mod:`rkd.deploy.card`);
  :mod:`rkd.deploy.load` reads an export back into torch.
* :mod:`rkd.deploy.predict` - ``rkd predict``: an exported student on images
  (letterboxed, optionally tiled), DOTA-format detections.
* :mod:`rkd.deploy.submit` - ``rkd submit/status/logs``: ``rkd search`` as a Ray Job.
"""
