"""Operator tools that need no ROS graph: chat with a model over a video file."""
