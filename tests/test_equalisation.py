"""Residual-stream equalisation (convert.equalisation): it finds exactly the linear streams a
MobileNetV2 block has, rescales their channels to a like range, and leaves the float model's
function as it was."""
import numpy as np


def residual_model(rng):
    """Two linear projections (Conv2D + BN, one channel ~50 x the others) summed, read by a 1x1
    convolution and a depthwise one; beside it a projection read by pooling (not rescalable)
    and BNs followed by ReLU6 (not linear)."""
    import train  # noqa: F401
    import tf_keras as keras

    layers = keras.layers
    image = keras.Input((8, 8, 4), name="image")
    first = layers.BatchNormalization(name="first_bn")(layers.Conv2D(8, 1, use_bias=False, name="first")(image))
    hidden = layers.ReLU(6.0)(layers.BatchNormalization(name="expand_bn")(
        layers.Conv2D(16, 1, use_bias=False, name="expand")(first)))
    second = layers.BatchNormalization(name="second_bn")(layers.Conv2D(8, 1, use_bias=False, name="second")(hidden))
    total = layers.Add(name="add")([first, second])
    deep = layers.ReLU(6.0)(layers.BatchNormalization(name="dw_bn")(
        layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(total)))
    side = layers.BatchNormalization(name="side_bn")(layers.Conv2D(4, 1, use_bias=False, name="side")(image))
    pooled = layers.Concatenate()([layers.GlobalAveragePooling2D()(deep), layers.GlobalAveragePooling2D()(side)])
    model = keras.Model(image, layers.Dense(3, name="logits")(pooled))
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, layers.BatchNormalization):
            n = weights[0].shape
            gamma = rng.uniform(0.5, 2, n)
            if layer.name == "first_bn":
                gamma[3] = 100.0                    # the outlier channel of the stream
            layer.set_weights([gamma, rng.normal(0, 0.5, n), rng.normal(0, 0.2, n), rng.uniform(0.2, 2, n)])
    return model


def test_streams_are_the_linear_bottlenecks_read_by_convolutions_only():
    from convert import equalisation as eq

    model = residual_model(np.random.default_rng(0))
    assert eq.streams(model) == [eq.Stream(producers=("first_bn", "second_bn"), adds=("add",),
                                           consumers=("dw", "expand"))]


def test_equalised_copy_computes_the_same_function_with_channels_of_like_range():
    from convert import equalisation as eq

    rng = np.random.default_rng(1)
    model = residual_model(rng)
    x = rng.uniform(-1, 1, (64, 8, 8, 4)).astype(np.float32)
    for alpha in (1.0, 0.5):
        copy, (stream,) = eq.equalised(model, x, alpha)
        np.testing.assert_allclose(copy.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
        assert stream["channels"] == 8 and stream["range_max_over_median_before"] > 5
        assert stream["range_max_over_median_after"] < stream["range_max_over_median_before"] / 2
        assert np.array_equal(model.get_layer("side_bn").get_weights()[0],
                              copy.get_layer("side_bn").get_weights()[0])   # not a stream: untouched
    ranges = eq.channel_ranges(copy := eq.equalised(model, x, 1.0)[0], eq.streams(copy), x)[0]
    assert ranges.max() / ranges.min() < 1.0 + 1e-3      # alpha 1: every channel's range alike, measured again
