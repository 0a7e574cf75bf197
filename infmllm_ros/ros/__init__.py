"""The ROS 2 face of the runtime: node, parameters, image decoding, ingest worker and tools.

Modules that import rclpy (node, ask, replay) need the ROS wheels installed by ``make test``;
images, params, worker and bag do not.
"""
