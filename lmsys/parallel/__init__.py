"""Meshes, multi-host set-up and the logical-axis rule table."""

from lmsys.parallel.mesh import DEFAULT_RULES, MESH_AXES, Rules, build_mesh, mesh_shape

__all__ = ["DEFAULT_RULES", "MESH_AXES", "Rules", "build_mesh", "mesh_shape"]
