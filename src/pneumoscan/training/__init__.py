"""Training and evaluation: the crop cache, the U-Nets' and the classifier's training (Lightning),
the head fit, and the evaluation reports. The pipeline modules never import from here."""
