"""``ros2 launch infmllm_ros orin.launch.py``: the stream-memory node with config/orin.yaml.

Arguments: ``namespace`` (default empty), ``params_file`` (default the installed orin.yaml),
``camera_topic`` (remaps the node's ``camera/front/image_raw/compressed``), ``use_sim_time``
(true when replaying bags), ``fastdds_profile`` (shared-memory transport for large images),
``autostart`` (true: the node configures and activates itself; false: it waits, unconfigured,
for a lifecycle manager such as nav2's ``lifecycle_manager``).

The node is a lifecycle node (``launch_ros.actions.LifecycleNode``), so launch event handlers
and lifecycle managers can drive it.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

from launch import LaunchDescription


def generate_launch_description():
    share = get_package_share_directory("infmllm_ros")
    return LaunchDescription(
        [
            DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
            DeclareLaunchArgument(
                "params_file", default_value=os.path.join(share, "config", "orin.yaml"), description="parameter YAML"
            ),
            DeclareLaunchArgument(
                "camera_topic",
                default_value="camera/front/image_raw/compressed",
                description="compressed front camera topic",
            ),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="run on /clock"),
            DeclareLaunchArgument(
                "autostart",
                default_value="true",
                description="configure and activate at start (false: wait for a lifecycle manager)",
            ),
            DeclareLaunchArgument(
                "fastdds_profile",
                default_value=os.path.join(share, "config", "fastdds_shm.xml"),
                description="Fast DDS profile of the node (shared-memory transport for raw frames, 16 MiB segment)",
            ),
            SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile")),
            LifecycleNode(
                package="infmllm_ros",
                executable="infmllm_node",
                name="infmllm",
                namespace=LaunchConfiguration("namespace"),
                parameters=[
                    LaunchConfiguration("params_file"),
                    {
                        "use_sim_time": LaunchConfiguration("use_sim_time"),
                        "autostart": LaunchConfiguration("autostart"),
                    },
                ],
                remappings=[("camera/front/image_raw/compressed", LaunchConfiguration("camera_topic"))],
                output="screen",
                emulate_tty=True,
            ),
        ]
    )
