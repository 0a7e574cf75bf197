"""The ROS 2 node and what it needs: parameters, image decoding, stamps, the ingest worker, the
memory image and the interface's field lists.

Only ``node`` imports rclpy (the ROS wheels ``make test`` installs); the worker has no rclpy.
"""
