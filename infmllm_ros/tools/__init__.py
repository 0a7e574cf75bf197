"""Operator and bag tools: ``infmllm-ask`` (the /ask console client), ``infmllm-make-bag``,
``infmllm-replay``, ``infmllm-demo`` and the process launcher they share; ``infmllm-chat`` (a
video through a model, no ROS); ``install_check`` (a colcon install space's node, once).

``ask`` and ``replay`` import rclpy (the ROS wheels ``make test`` installs); ``bag``, ``demo``
and ``chat`` do not.
"""
