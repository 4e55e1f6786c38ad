"""Sphinx configuration of the skcarrot documentation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import skcarrot  # noqa: E402

project = "skcarrot"
author = "the skcarrot developers"
copyright = "2026, the skcarrot developers"
version = release = skcarrot.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip"]
autosummary_generate = True
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    # a second, double-resolution copy of each plot, for sharp images at full width
    "image_srcset": ["2x"],
}

html_theme = "pydata_sphinx_theme"
html_title = "skcarrot"
html_theme_options = {
    "navigation_with_keys": False,
    # every top-level page in the top bar, none under "More"
    "header_links_before_dropdown": 10,
    "navbar_align": "left",
    "navbar_persistent": ["search-button"],
    # the site's contents in the left sidebar, sections opened one level
    "show_nav_level": 1,
    "navigation_depth": 2,
}
templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_sidebars = {"**": ["sidebar-site-nav"]}
intersphinx_mapping = {}
