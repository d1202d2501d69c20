"""
Packaging for steptrack.

``twisted.plugins`` is listed explicitly: it is not a regular package of
ours (it has no ``__init__.py``), but the plugin module in it is what makes
``twistd steptrack`` exist once the wheel is installed.
"""

from setuptools import setup

setup(
    packages=["steptrackd", "twisted.plugins"],
    package_data={"steptrackd": ["py.typed"]},
)
