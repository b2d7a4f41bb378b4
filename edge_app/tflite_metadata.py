"""Read and write the model card embedded in a `.tflite` file; read its signature's I/O types.

A TFLite flatbuffer has a `metadata` list of (name, buffer index) pairs; the card is stored
there as UTF-8 JSON under CARD_METADATA_NAME, so the file alone describes itself. The schema
module comes with LiteRT (and with TensorFlow), so neither side needs anything extra.
"""
from __future__ import annotations

import numpy as np

CARD_METADATA_NAME = "cxr_edge_model_card"
MAX_SIGNATURE_TENSORS = 64   # far above this project's (one input, four outputs)


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # a training machine without LiteRT
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def packed(model, size: int = 1024) -> bytes:
    """The .tflite bytes of a flatbuffer object model (`schema.ModelT`)."""
    import flatbuffers

    builder = flatbuffers.Builder(size)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(model_bytes: bytes) -> dict[str, bytes]:
    """All metadata entries of a TFLite model, by name."""
    schema = _schema()
    model = schema.Model.GetRootAs(model_bytes, 0)
    entries = {}
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        buffer = model.Buffers(meta.Buffer())
        if buffer.DataLength():
            data = buffer.DataAsNumpy().tobytes()
        else:  # large models keep buffer data after the flatbuffer
            data = bytes(model_bytes[buffer.Offset(): buffer.Offset() + buffer.Size()])
        entries[meta.Name().decode()] = data
    return entries


def float_io(model_bytes: bytes) -> bool | None:
    """Whether every input and output of the model's default signature is float32 (what the
    CompiledModel API runs), read from the flatbuffer without loading a runtime; None when the
    flatbuffer cannot tell (no signature, or damaged): the runtimes then say what is wrong."""
    try:
        schema = _schema()
        model = schema.Model.GetRootAs(model_bytes, 0)
        if not model.SignatureDefsLength():
            return None
        signature = model.SignatureDefs(0)
        tensors = model.Subgraphs(signature.SubgraphIndex())
        inputs, outputs = signature.InputsLength(), signature.OutputsLength()
        if inputs + outputs > MAX_SIGNATURE_TENSORS:   # a damaged length: not worth walking
            return None
        ends = [signature.Inputs(i) for i in range(inputs)] + [signature.Outputs(i) for i in range(outputs)]
        return all(tensors.Tensors(end.TensorIndex()).Type() == schema.TensorType.FLOAT32 for end in ends)
    except Exception:  # noqa: BLE001 - a damaged flatbuffer raises anything; None = cannot tell
        return None


def write_metadata(model_bytes: bytes, name: str, data: bytes) -> bytes:
    """A copy of the model with metadata `name` set to `data` (replacing any earlier one)."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    model.metadata = [m for m in (model.metadata or []) if m.name.decode() != name]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    return packed(model, len(model_bytes) + len(data) + 1024)
