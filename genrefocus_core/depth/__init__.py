"""The depth family: Depth Pro (either checkpoint layout) and depth or disparity from files and other
sources, converted to metric depth."""
