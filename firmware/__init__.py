"""Everything that stands for the device: sensor node, codec, DSP in C, runtime, OTA, C sources.

The numpy DSP front end both sides share is a contract: :mod:`tinymlops.contracts.dsp`.
"""
