"""bifocal.launcher"""
