"""Everything that stands for the device: sensor node, codec, DSP, runtime, OTA, C sources."""
