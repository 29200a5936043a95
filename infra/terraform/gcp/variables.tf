variable "project_id" {
  description = "Google Cloud project of the buckets and the Dataproc batches"
  type        = string
}

variable "region" {
  description = "Region of the buckets, the batches and the image repository, e.g. europe-west1"
  type        = string
}

variable "name_prefix" {
  description = "Prefix of every resource name; bucket names also get the project id to be globally unique"
  type        = string
  default     = "admm-mnist"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name_prefix))
    error_message = "name_prefix: 3-21 lowercase letters, digits or dashes, starting with a letter."
  }
}

variable "airflow_member" {
  description = "IAM member Airflow authenticates as (connection google_cloud_default), e.g. serviceAccount:airflow@p.iam.gserviceaccount.com; null: grant nothing"
  type        = string
  default     = null
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before it is deleted"
  type        = number
  default     = 90
}
