"""The faces: the command line, the REST server and web page, the DICOM listener, Ray. Each is a
thin layer over :class:`pneumoscan.predict.Predictor` and :mod:`pneumoscan.outputs.writer`."""
