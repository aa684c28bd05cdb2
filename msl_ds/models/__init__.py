"""Bringing checkpoints in: :mod:`msl_ds.models.sources` finds what a source names (a GGUF file, a pip
package that ships one, a Hugging Face directory), :mod:`msl_ds.models.importer` turns it into the
plain Hugging Face model directory the trainer starts from (``msl-import-model``)."""
