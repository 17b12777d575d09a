"""Everything that knows upstream OpenVLA's conventions (pixel layout, module layout)."""
