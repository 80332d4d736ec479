"""edgellm: LLM inference for CPUs and edge devices."""
