"""hotcold: offline neuron profiling and placement compiler for hybrid GPU+CPU LLM inference."""

__version__ = "0.1.0"
