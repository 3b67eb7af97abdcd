"""bifocal.eval"""
