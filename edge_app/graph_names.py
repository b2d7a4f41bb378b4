"""The names of a cxr-edge model's layers and outputs, shared by training (train.models), export
(convert.export) and the device (edge_app.classifier), so that a renamed layer cannot silently
leave the device reading an output that is no longer there. No TensorFlow here: the device imports it."""

FEATURES = "features"   # layer: the last convolutional feature map, read by the class-activation maps
POOL = "pool"           # layer: the pooled (penultimate) features, read by the probe and the OOD score
DROPOUT = "dropout"     # layer: between the pooled features and the logits
LOGITS = "logits"       # layer and output: one logit per model card label, in the card's order
HEATMAP = "heatmap"     # output: the in-graph class-activation map
OOD_WHITENED = "ood_whitened"   # output: the pooled features on the OOD score's principal directions
OOD_RESIDUAL = "ood_residual"   # output: what those directions leave of the features
OOD_PARTS = (OOD_WHITENED, OOD_RESIDUAL)   # train.ood's score = the sum of their squares
