"""bifocal.model"""
