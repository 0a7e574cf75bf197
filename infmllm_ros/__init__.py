"""infmllm_ros: streaming multimodal LLM memory for ROS 2 robots (Inf-MLLM KV cache)."""

__version__ = "0.1.0"
